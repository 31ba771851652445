//! SVG plots of a run with `plotters` (SVG backend only: text goes out as SVG `<text>` and is
//! laid out with plotters' built-in size estimate, so no font library is needed).
//!
//! Two shapes: grouped bars (a category per group, a bar per series) and lines over
//! categories. Both take `Option<f64>` values; a missing value draws nothing.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

/// Series colours, in order (colour-blind friendly: Okabe–Ito).
const COLOURS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// A chart: categories on x, one value per category per series.
#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    /// (series name, one value per category).
    pub series: Vec<(String, Vec<Option<f64>>)>,
    /// Logarithmic y axis (values must be > 0; others are not drawn).
    pub log_y: bool,
}

impl Chart {
    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.series
            .iter()
            .flat_map(|(_, v)| v.iter().flatten().copied())
            .filter(|x| x.is_finite() && (!self.log_y || *x > 0.0))
    }

    /// Whether there is anything to draw.
    pub fn is_empty(&self) -> bool {
        self.categories.is_empty() || self.values().next().is_none()
    }

    /// The y range: from 0 (linear) or a decade below the least value (log) to a bit above
    /// the largest.
    fn y_range(&self) -> (f64, f64) {
        let max = self.values().fold(f64::MIN, f64::max);
        let min = self.values().fold(f64::MAX, f64::min);
        if self.log_y {
            let lo = 10f64.powf(min.log10().floor());
            let hi = 10f64.powf((max * 1.5).log10().ceil()).max(lo * 10.0);
            (lo, hi)
        } else {
            (0.0, if max > 0.0 { max * 1.15 } else { 1.0 })
        }
    }
}

/// Short numbers for axis labels: 1.2k, 3.4M.
pub fn si(x: f64) -> String {
    let a = x.abs();
    if a >= 1e6 {
        let s = format!("{:.3}", x / 1e6);
        format!("{}M", s.trim_end_matches('0').trim_end_matches('.'))
    } else if a >= 1e3 {
        let s = format!("{:.2}", x / 1e3);
        format!("{}k", s.trim_end_matches('0').trim_end_matches('.'))
    } else if a >= 1.0 || a == 0.0 {
        let s = format!("{x:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{x:.3}")
    }
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 540;
/// Width of the legend column on the right (the plot never hides behind it).
const LEGEND_W: u32 = 210;

/// The legend in its own column: a swatch (a bar or a line) and the series name per row.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    names: &[&str],
    lines: bool,
) -> Result<()> {
    let style = ("sans-serif", 13).into_font().color(&BLACK);
    for (i, name) in names.iter().enumerate() {
        let y = 60 + 22 * i as i32;
        let c = colour(i);
        if lines {
            area.draw(&PathElement::new(vec![(8, y), (28, y)], c.stroke_width(2)))
                .map_err(err)?;
            area.draw(&Circle::new((18, y), 4, c.filled()))
                .map_err(err)?;
        } else {
            area.draw(&Rectangle::new([(8, y - 6), (24, y + 6)], c.filled()))
                .map_err(err)?;
        }
        area.draw(&Text::new(name.to_string(), (34, y - 7), style.clone()))
            .map_err(err)?;
    }
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// Grouped bars: a group per category, a bar per series.
pub fn bars_svg(chart: &Chart, path: &Path) -> Result<()> {
    let whole = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    whole.fill(&WHITE).map_err(err)?;
    let (root, legend) = whole.split_horizontally(WIDTH - LEGEND_W);
    let names: Vec<&str> = chart.series.iter().map(|(n, _)| n.as_str()).collect();
    draw_legend(&legend, &names, false)?;
    let cats = &chart.categories;
    let n_series = chart.series.len().max(1);
    let (lo, hi) = chart.y_range();
    // Integer ranges are inclusive in plotters: 0..n-1 is n categories.
    let last = cats.len() as i32 - 1;
    let x = (0..last).nested_coord(|_| 0.0..1.0);
    let name_of = |i: i32| usize::try_from(i).ok().and_then(|i| cats.get(i)).cloned();
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(&chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    let bar_w = 0.8 / n_series as f64;
    let value_label = |v: &NestedValue<i32, f64>| match v {
        NestedValue::Category(c) => name_of(*c).unwrap_or_default(),
        NestedValue::Value(..) => String::new(),
    };
    macro_rules! draw {
        ($ctx:expr, $base:expr) => {{
            let mut ctx = $ctx;
            ctx.configure_mesh()
                .disable_x_mesh()
                .x_labels(cats.len())
                .x_label_formatter(&value_label)
                .y_desc(chart.y_label.as_str())
                .y_label_formatter(&|y| si(*y))
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(err)?;
            for (si_, (_, vals)) in chart.series.iter().enumerate() {
                let c = colour(si_);
                let rects: Vec<Rectangle<(NestedValue<i32, f64>, f64)>> = (0..=last)
                    .zip(vals)
                    .filter_map(|(cat, v)| {
                        let v = (*v)?;
                        if !v.is_finite() || (chart.log_y && v <= 0.0) {
                            return None;
                        }
                        let x0 = 0.1 + bar_w * si_ as f64;
                        Some(Rectangle::new(
                            [
                                (NestedValue::Value(cat, x0), $base),
                                (NestedValue::Value(cat, x0 + bar_w * 0.92), v),
                            ],
                            c.filled(),
                        ))
                    })
                    .collect();
                ctx.draw_series(rects).map_err(err)?;
            }
        }};
    }
    if chart.log_y {
        let ctx = builder
            .build_cartesian_2d(x, (lo..hi).log_scale())
            .map_err(err)?;
        draw!(ctx, lo);
    } else {
        let ctx = builder.build_cartesian_2d(x, lo..hi).map_err(err)?;
        draw!(ctx, 0.0);
    }
    whole.present().map_err(err)?;
    Ok(())
}

/// Lines over categories (one point per category per series).
pub fn lines_svg(chart: &Chart, path: &Path) -> Result<()> {
    let whole = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    whole.fill(&WHITE).map_err(err)?;
    let (root, legend) = whole.split_horizontally(WIDTH - LEGEND_W);
    let names: Vec<&str> = chart.series.iter().map(|(n, _)| n.as_str()).collect();
    draw_legend(&legend, &names, true)?;
    let cats = &chart.categories;
    let (lo, hi) = chart.y_range();
    let last = cats.len() as i32 - 1;
    let x = (0..last).into_segmented();
    let name_of = |i: i32| usize::try_from(i).ok().and_then(|i| cats.get(i)).cloned();
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(&chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    let value_label = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(c) | SegmentValue::Exact(c) => name_of(*c).unwrap_or_default(),
        SegmentValue::Last => String::new(),
    };
    macro_rules! draw {
        ($ctx:expr) => {{
            let mut ctx = $ctx;
            ctx.configure_mesh()
                .disable_x_mesh()
                .x_labels(cats.len())
                .x_label_formatter(&value_label)
                .y_desc(chart.y_label.as_str())
                .y_label_formatter(&|y| si(*y))
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(err)?;
            for (i, (_, vals)) in chart.series.iter().enumerate() {
                let c = colour(i);
                let pts: Vec<(SegmentValue<i32>, f64)> = (0..=last)
                    .zip(vals)
                    .filter_map(|(cat, v)| {
                        let v = (*v)?;
                        (v.is_finite() && (!chart.log_y || v > 0.0))
                            .then_some((SegmentValue::CenterOf(cat), v))
                    })
                    .collect();
                ctx.draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                    .map_err(err)?;
                ctx.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))
                    .map_err(err)?;
            }
        }};
    }
    if chart.log_y {
        draw!(builder
            .build_cartesian_2d(x, (lo..hi).log_scale())
            .map_err(err)?);
    } else {
        draw!(builder.build_cartesian_2d(x, lo..hi).map_err(err)?);
    }
    whole.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(log_y: bool) -> Chart {
        Chart {
            title: "4k random read QD32 <&> \"quotes\"".into(),
            y_label: "IOPS".into(),
            categories: vec!["fio x1".into(), "lean x1".into(), "lean x2".into()],
            series: vec![
                (
                    "ringblock".into(),
                    vec![Some(45_000.0), Some(230_000.0), Some(210_000.0)],
                ),
                (
                    "nbdkit memory".into(),
                    vec![Some(40_000.0), None, Some(0.0)],
                ),
            ],
            log_y,
        }
    }

    #[test]
    fn writes_well_formed_svgs() {
        let dir = tempfile::tempdir().unwrap();
        for log_y in [false, true] {
            for (i, f) in [bars_svg as fn(&Chart, &Path) -> Result<()>, lines_svg]
                .iter()
                .enumerate()
            {
                let p = dir.path().join(format!("c{i}{log_y}.svg"));
                f(&chart(log_y), &p).unwrap();
                let text = std::fs::read_to_string(&p).unwrap();
                assert!(text.trim_start().starts_with("<svg"), "{}", &text[..80]);
                assert!(text.trim_end().ends_with("</svg>"));
                assert!(text.contains("ringblock") && text.contains("nbdkit memory"));
                assert!(text.contains("lean x2"), "category labels are drawn");
                assert!(text.contains("&lt;&amp;&gt;"), "text is escaped");
            }
        }
    }

    #[test]
    fn ranges_and_labels() {
        let c = chart(false);
        assert!(!c.is_empty());
        assert_eq!(c.y_range(), (0.0, 230_000.0 * 1.15));
        let (lo, hi) = chart(true).y_range();
        assert_eq!(lo, 10_000.0);
        assert!(hi >= 230_000.0 * 1.5);
        let empty = Chart {
            series: vec![("x".into(), vec![None])],
            ..chart(false)
        };
        assert!(empty.is_empty());
        assert_eq!(si(233_000.0), "233k");
        assert_eq!(si(1_500.0), "1.5k");
        assert_eq!(si(2_250_000.0), "2.25M");
        assert_eq!(si(12.0), "12");
        assert_eq!(si(0.5), "0.500");
        assert_eq!(si(0.0), "0");
    }
}
