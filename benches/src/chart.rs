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

/// An SVG document's opening: size, white background, bold title.
fn open_svg(width: f64, height: f64, title: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="6" y="18" font-size="14" font-weight="bold">{}</text>"#, escape(title));
    out
}

/// An SVG with a title and one block of bars per panel; Rampart's bars are orange, the others
/// grey (a label starting with "rampart" or naming the "full stack" is Rampart's).
pub fn svg(title: &str, panels: &[Panel]) -> String {
    let width = LABEL_WIDTH + BAR_SPACE + TEXT_WIDTH;
    let height = HEADING + panels.iter().map(|p| HEADING + ROW * p.bars.len() as f64).sum::<f64>() + 8.0;
    let mut out = open_svg(width, height, title);
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

/// One line of [`lines`].
#[derive(Debug, Clone)]
pub struct Line {
    /// Legend label.
    pub name: String,
    /// `(x, y)` points.
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 6] = ["#adb5bd", "#1c7ed6", "#e8590c", "#2f9e44", "#ae3ec9", "#f08c00"];

/// A line chart as SVG: x (seconds) against y, logarithmic y when `log_y`. Lines are coloured
/// in order (grey, blue, orange, ...): put Rampart's last so it is orange.
pub fn lines(title: &str, y_label: &str, x_label: &str, log_y: bool, lines: &[Line]) -> String {
    let (width, height) = (900.0, 340.0);
    let (left, right, top, bottom) = (70.0, 340.0, 34.0, 40.0);
    let (plot_w, plot_h) = (width - left - right, height - top - bottom);
    let points = lines.iter().flat_map(|l| l.points.iter());
    let x_max = points.clone().map(|p| p.0).fold(0.0_f64, f64::max).max(1e-9);
    let ys: Vec<f64> = points.map(|p| p.1).filter(|y| y.is_finite() && (!log_y || *y > 0.0)).collect();
    let y_max = ys.iter().copied().fold(f64::MIN_POSITIVE, f64::max);
    let y_min = if log_y { ys.iter().copied().fold(f64::INFINITY, f64::min).max(1e-9) } else { 0.0 };
    let scale_y = |y: f64| {
        let f = if log_y {
            let (lo, hi) = (y_min.log10().floor(), y_max.log10().ceil().max(y_min.log10().floor() + 1.0));
            (y.max(y_min).log10() - lo) / (hi - lo)
        } else {
            y / (y_max * 1.05)
        };
        top + plot_h * (1.0 - f.clamp(0.0, 1.0))
    };
    let scale_x = |x: f64| left + plot_w * (x / x_max);
    let mut out = open_svg(width, height, title);
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#868e96"/>"##
    );
    // Y ticks: decades on a log axis, fifths otherwise.
    let ticks: Vec<f64> = if log_y {
        let (lo, hi) = (y_min.log10().floor() as i32, y_max.log10().ceil().max(y_min.log10().floor() + 1.0) as i32);
        (lo..=hi).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=5).map(|i| y_max * 1.05 * f64::from(i) / 5.0).collect()
    };
    for tick in ticks {
        let y = scale_y(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e9ecef"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + plot_w,
            left - 4.0,
            y + 4.0,
            short(tick)
        );
    }
    for i in 0..=5 {
        let x = x_max * f64::from(i) / 5.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            scale_x(x),
            top + plot_h + 16.0,
            short(x)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + plot_w / 2.0,
        height - 6.0,
        escape(x_label)
    );
    let _ = writeln!(
        out,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        escape(y_label)
    );
    for (i, line) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = line
            .points
            .iter()
            .filter(|p| p.1.is_finite() && (!log_y || p.1 > 0.0))
            .map(|p| format!("{:.1},{:.1}", scale_x(p.0), scale_y(p.1)))
            .collect();
        let _ =
            writeln!(out, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, path.join(" "));
        let ly = top + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            out,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            left + plot_w + 10.0,
            left + plot_w + 28.0,
            left + plot_w + 32.0,
            ly + 4.0,
            escape(&line.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A compact number for axis labels.
fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
