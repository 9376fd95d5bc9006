//! The report's timeline as an SVG plot: pages/s sent and dirtied over time, and remote faults
//! per second, from the samples the sender thread took.

use std::fmt::Write;

use super::source::Report;

/// Rates between consecutive samples: (t seconds, sent/s, dirtied/s, faults/s).
fn rates(r: &Report) -> Vec<(f64, f64, f64, f64)> {
    r.timeline
        .windows(2)
        .filter_map(|w| {
            let dt = (w[1].t_ms.saturating_sub(w[0].t_ms)) as f64 / 1e3;
            (dt > 0.0).then(|| {
                (
                    w[1].t_ms as f64 / 1e3,
                    (w[1].sent - w[0].sent) as f64 / dt,
                    (w[1].dirtied.saturating_sub(w[0].dirtied)) as f64 / dt,
                    (w[1].faults.saturating_sub(w[0].faults)) as f64 / dt,
                )
            })
        })
        .collect()
}

/// Renders the timeline.
pub fn svg(r: &Report) -> String {
    let pts = rates(r);
    let (w, h, left, top, bottom) = (900.0, 420.0, 80.0, 40.0, 50.0);
    let pw = w - left - 20.0;
    let ph = h - top - bottom;
    let tmax = pts.last().map(|p| p.0).unwrap_or(1.0).max(0.001);
    let ymax = pts
        .iter()
        .map(|p| p.1.max(p.2).max(p.3))
        .fold(1.0f64, f64::max);
    let x = |t: f64| left + t / tmax * pw;
    let y = |v: f64| top + ph - v / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">spanvmm migration ({}, {:.0} ms total, downtime {:.2} ms, {} rounds)</text>"#,
        r.handover, r.total_ms, r.downtime_ms, r.rounds
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#,
        top + ph,
        left + pw,
        top + ph,
        top + ph
    );
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        let t = tmax * i as f64 / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{:.0}</text><text x="{}" y="{}" text-anchor="middle">{:.2} s</text>"#,
            left - 6.0,
            y(v) + 4.0,
            v,
            x(t),
            top + ph + 18.0,
            t
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})">pages/s</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    for (k, (name, color)) in [
        ("sent", "#1f77b4"),
        ("dirtied", "#d62728"),
        ("faults", "#2ca02c"),
    ]
    .iter()
    .enumerate()
    {
        let line: Vec<String> = pts
            .iter()
            .map(|p| {
                let v = [p.1, p.2, p.3][k];
                format!("{:.1},{:.1}", x(p.0), y(v))
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            line.join(" ")
        );
        let ly = top + 14.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{}">{name}</text>"#,
            left + pw - 90.0,
            ly,
            left + pw - 72.0,
            ly + 5.0
        );
    }
    s.push_str("</svg>\n");
    s
}
