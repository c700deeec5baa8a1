//! Horizontal bar charts as SVG, for `benches/RESULTS.md` (no plotting dependency; GitHub and
//! any browser render them).

use std::fmt::Write as _;

/// One bar.
#[derive(Debug, Clone)]
pub struct Bar {
    /// Label left of the bar.
    pub label: String,
    /// Length.
    pub value: f64,
    /// Text right of the bar (the value with its unit).
    pub text: String,
}

/// A panel: bars sharing one unit and one scale.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Heading above the bars (e.g. the unit).
    pub title: String,
    /// The bars, top to bottom.
    pub bars: Vec<Bar>,
}

const LABEL_WIDTH: f64 = 430.0;
const BAR_SPACE: f64 = 300.0;
const TEXT_WIDTH: f64 = 140.0;
const ROW: f64 = 22.0;
const HEADING: f64 = 26.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An SVG with a title and one block of bars per panel; Rampart's bars are orange, the others
/// grey (a label starting with "rampart" or naming the "full stack" is Rampart's).
pub fn svg(title: &str, panels: &[Panel]) -> String {
    let width = LABEL_WIDTH + BAR_SPACE + TEXT_WIDTH;
    let height = HEADING + panels.iter().map(|p| HEADING + ROW * p.bars.len() as f64).sum::<f64>() + 8.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="6" y="18" font-size="14" font-weight="bold">{}</text>"#, escape(title));
    let mut y = HEADING;
    for panel in panels {
        let _ = writeln!(out, r#"<text x="6" y="{}" font-style="italic">{}</text>"#, y + 17.0, escape(&panel.title));
        y += HEADING;
        let max = panel.bars.iter().map(|b| b.value).fold(0.0_f64, f64::max).max(f64::MIN_POSITIVE);
        for bar in &panel.bars {
            let length = (bar.value / max * BAR_SPACE).max(1.0);
            let ours = bar.label.to_lowercase().starts_with("rampart") || bar.label.contains("full stack");
            let fill = if ours { "#e8590c" } else { "#adb5bd" };
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{LABEL_WIDTH}" y="{}" width="{length:.1}" height="{}" fill="{fill}"/><text x="{}" y="{}">{}</text>"#,
                LABEL_WIDTH - 6.0,
                y + 15.0,
                escape(&bar.label),
                y + 4.0,
                ROW - 6.0,
                LABEL_WIDTH + length + 4.0,
                y + 15.0,
                escape(&bar.text)
            );
            y += ROW;
        }
    }
    out.push_str("</svg>\n");
    out
}

/// A file name for a title: lowercase letters and digits joined by `-`.
pub fn slug(title: &str) -> String {
    let mut out = String::new();
    for c in title.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').chars().take(60).collect::<String>().trim_end_matches('-').to_owned()
}
